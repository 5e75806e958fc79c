"""Test-owned XenServer (XAPI) simulator: real XenAPI.py over real XML-RPC, real VDI bytes.

Start it with ``tests.xapi_sim.control.SimulatorProcess`` and connect with::

    session = XenAPI.Session(f"http://127.0.0.1:{port}")
    session.xenapi.login_with_password(user, password, "2.21", "snapferry")

See README.md in this directory for what is (and is not) modelled.
"""
