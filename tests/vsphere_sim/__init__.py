"""Test-owned vSphere simulator: real pyvmomi over real SOAP/HTTP, real disk bytes.

Start it with ``tests.vsphere_sim.control.SimulatorProcess`` and connect with::

    SmartConnect(protocol="http", host="127.0.0.1", port=port, user=user, pwd=password)

See README.md in this directory for what is (and is not) modelled.
"""
