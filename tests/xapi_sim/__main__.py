"""``python -m tests.xapi_sim --port P --root DIR [--user U --password-file F]``.

Binds 127.0.0.1 only and prints ``ready <port>`` once listening (``--port 0`` picks
a free port). The password comes from a file so it never shows up in ``ps``.
"""

from __future__ import annotations

from tests.simulator import serve_main

from .server import SimServer


def main(argv: list[str] | None = None) -> None:
    serve_main(
        "python -m tests.xapi_sim",
        default_user="root",
        root_help="VDI files live under it",
        make_server=SimServer,
        argv=argv,
    )


if __name__ == "__main__":
    main()
