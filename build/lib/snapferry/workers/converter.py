"""The data converter every snapferry client and worker uses: pydantic, with bad input
turned into a clear, non-retryable failure.

Management code in any language calls the workflows by name with JSON. With the plain
pydantic converter, a payload that does not match its schema (``{}``, a string, a
path-traversal ID) makes the SDK fail the *workflow task*, which Temporal retries forever:
the workflow sits Running in every operator's list and nobody is told what was wrong. The
SDK fails the *workflow* instead when decoding raises a Temporal failure error
(``_WorkflowInstanceImpl._convert_payloads`` re-raises ``FailureError``), so this converter
raises ``ApplicationError(type="InvalidInput", non_retryable=True)`` naming each bad field.
The same applies to update and signal arguments and to activity inputs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import temporalio.api.common.v1
from pydantic import ValidationError
from temporalio.contrib.pydantic import PydanticPayloadConverter, pydantic_data_converter
from temporalio.converter import DataConverter
from temporalio.exceptions import ApplicationError


def describe_validation_error(err: ValidationError, what: str) -> str:
    """``SnapshotRequest: volume.vm.name: Value error, '../x' is not a valid name; ...``"""
    problems = []
    for e in err.errors(include_url=False):
        where = ".".join(str(p) for p in e.get("loc", ())) or "(the whole payload)"
        problems.append(f"{where}: {e.get('msg', 'invalid')}")
    return f"{what} does not match its schema: " + "; ".join(problems)


class ValidatingPayloadConverter(PydanticPayloadConverter):
    def from_payloads(
        self,
        payloads: Sequence[temporalio.api.common.v1.Payload],
        type_hints: list[type] | None = None,
    ) -> list[Any]:
        try:
            return super().from_payloads(payloads, type_hints)
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, ValidationError):
                cause = cause.__cause__ or cause.__context__
            if isinstance(cause, ValidationError):
                message = describe_validation_error(cause, cause.title)
            else:
                message = f"a payload could not be decoded: {err}"
            raise ApplicationError(message, type="InvalidInput", non_retryable=True) from None


DATA_CONVERTER: DataConverter = dataclasses.replace(
    pydantic_data_converter, payload_converter_class=ValidatingPayloadConverter
)
