"""SOAP 1.1 wire format for the simulator, built on pyVmomi's own (de)serialiser.

Reusing ``pyVmomi.SoapAdapter`` on the server side means the XML the client sees
is produced by the same type tables the client parses with, so a request or a
response the simulator accepts is one real pyvmomi really sends or understands.
pyVmomi ships only a *response* parser, so ``parse_request`` drives its
``SoapDeserializer`` once per parameter element of the request body.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.parsers.expat import ParserCreate

from pyVmomi import VmomiSupport as vs
from pyVmomi import vmodl
from pyVmomi.SoapAdapter import (
    NS_SEP,
    SOAP_END,
    SOAP_NSMAP,
    SOAP_START,
    XML_HEADER,
    ExpatDeserializerNSHandlers,
    GetHandlers,
    SerializeFaultDetail,
    SerializeToStr,
    SetHandlers,
    SoapDeserializer,
    XmlEscape,
)

NEWEST = vs.newestVersions.Get("vim")
# pyVmomi reads properties with a private "Fetch" method (StubAdapterAccessorImpl);
# it is not in the WSDL tables, so its single parameter is described here.
_FETCH_PARAMS = (vs.Object(name="prop", type=str, version=NEWEST, flags=0),)
_THIS = vs.Object(name="_this", type=vs.ManagedObject, version=NEWEST, flags=0)


@dataclass
class SoapRequest:
    """One decoded SOAP call: wsdl method name, target object and named arguments."""

    method: str = ""
    this: Any = None
    args: dict[str, Any] = field(default_factory=dict)


def version_from_soapaction(header: str | None) -> str:
    """Map ``SOAPAction: "urn:vim25/8.0.3.0"`` to a pyVmomi version name."""
    key = (header or "").strip('"').removeprefix("urn:")
    return vs.versionMap.get(key, NEWEST)


def method_info(name: str) -> Any:
    """The pyVmomi ManagedMethod info for a wsdl method name, or None if unknown."""
    try:
        return vs.GetWsdlMethod("urn:vim25", name).info
    except KeyError:
        return None


class _RequestParser(ExpatDeserializerNSHandlers):
    """Expat handlers: find Body/<Method>, deserialise each child with pyVmomi."""

    def __init__(self, version: str) -> None:
        super().__init__()
        self.version = version
        self.req = SoapRequest()
        self.depth = 0
        self.in_body = False
        self.params: dict[str, Any] = {}
        self.pending: tuple[str, bool, SoapDeserializer] | None = None

    def parse(self, body: bytes) -> SoapRequest:
        self.parser = ParserCreate(namespace_separator=NS_SEP)
        self.parser.buffer_text = True
        SetHandlers(self.parser, GetHandlers(self))
        self.parser.Parse(body, True)
        self._collect()
        return self.req

    def _collect(self) -> None:
        """Store a parameter that a SoapDeserializer finished (it ate the end tag)."""
        if self.pending is None:
            return
        name, is_list, deser = self.pending
        self.pending = None
        self.depth -= 1
        value = deser.GetResult()
        if name == "_this":
            self.req.this = value
        elif is_list:
            self.req.args.setdefault(name, []).append(value)
        else:
            self.req.args[name] = value

    def StartElementHandler(self, tag: str, attr: dict[str, str]) -> None:  # noqa: N802
        self._collect()
        self.depth += 1
        local = tag.split(NS_SEP)[-1]
        if self.depth == 2:
            self.in_body = local == "Body"
        elif self.depth == 3 and self.in_body:
            self.req.method = local
            info = method_info(local)
            params = _FETCH_PARAMS if local == "Fetch" else (info.params if info else ())
            self.params = {p.name: p for p in (_THIS, *params)}
        elif self.depth == 4 and local in self.params:
            typ = self.params[local].type
            is_list = issubclass(typ, list)
            deser = SoapDeserializer(version=self.version)
            deser.Deserialize(self.parser, typ.Item if is_list else typ, False, self.nsMap)
            deser.StartElementHandler(tag, attr)
            self.pending = (local, is_list, deser)

    def EndElementHandler(self, tag: str) -> None:  # noqa: N802
        self._collect()
        self.depth -= 1

    def CharacterDataHandler(self, data: str) -> None:  # noqa: N802
        pass


def parse_request(body: bytes, version: str) -> SoapRequest:
    """Decode a SOAP request envelope into method, ``_this`` and typed arguments."""
    return _RequestParser(version).parse(body)


def _ns_map(version: str) -> dict[str, str]:
    return {**SOAP_NSMAP, vs.GetWsdlNamespace(version): ""}


def response(method: str, result: Any, result_type: type, version: str) -> bytes:
    """Serialise ``<MethodResponse><returnval>`` (omitted when the result is unset)."""
    ns = vs.GetWsdlNamespace(version)
    body = ""
    if result is not None:
        info = vs.Object(name="returnval", type=result_type, version=version, flags=vs.F_OPTIONAL)
        body = SerializeToStr(result, info, version, _ns_map(version))
    xml = f'{XML_HEADER}\n{SOAP_START}<{method}Response xmlns="{ns}">{body}</{method}Response>'
    return (xml + SOAP_END).encode()


def fault(exc: vmodl.MethodFault, version: str) -> bytes:
    """Serialise a MethodFault the way vSphere does: faultstring + typed <detail>."""
    ns = vs.GetWsdlNamespace(version)
    tag = vs.GetWsdlName(type(exc)) + "Fault"
    info = vs.Object(name=tag, type=object, version=version, flags=0)
    detail = SerializeFaultDetail(exc, info, version, _ns_map(version))
    # The fault element must be in the vim namespace, but <detail> itself must not be.
    detail = detail.replace(f"<{tag}", f'<{tag} xmlns="{ns}"', 1)
    msg = XmlEscape(exc.msg or type(exc).__name__)
    xml = (
        f"{XML_HEADER}\n{SOAP_START}<soapenv:Fault><faultcode>ServerFaultCode</faultcode>"
        f"<faultstring>{msg}</faultstring><detail>{detail}</detail></soapenv:Fault>"
    )
    return (xml + SOAP_END).encode()


def service_versions_xml() -> bytes:
    """``/sdk/vimServiceVersions.xml``: what pyVim.connect.SmartConnect negotiates from."""
    ids = [vs.versionIdMap[v] for v in vs.GetServiceVersions("vim25") if v.startswith("vim.")]
    prior = "".join(f"<version>{i}</version>" for i in ids[1:])
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<namespaces version="1.0"><namespace>'
        f"<name>urn:vim25</name><version>{ids[0]}</version>"
        f"<priorVersions>{prior}</priorVersions></namespace></namespaces>\n"
    ).encode()


SERVICE_WSDL = b"""<?xml version="1.0" encoding="UTF-8"?>
<definitions targetNamespace="urn:vim25Service" xmlns="http://schemas.xmlsoap.org/wsdl/"
  xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/">
  <import location="vim.wsdl" namespace="urn:vim25"/>
  <service name="VimService"><port binding="interface:VimBinding" name="VimPort">
    <soap:address location="https://localhost/sdk/vimService"/></port></service>
</definitions>
"""
