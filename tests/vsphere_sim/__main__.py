"""``python -m tests.vsphere_sim --port P --root DIR [--user U --password-file F]``.

Binds 127.0.0.1 only and prints ``ready <port>`` once listening (``--port 0`` picks
a free port). The password comes from a file so it never shows up in ``ps``.
"""

from __future__ import annotations

from tests.simulator import serve_main

from .inventory import Inventory
from .server import SimServer


def main(argv: list[str] | None = None) -> None:
    serve_main(
        "python -m tests.vsphere_sim",
        default_user="administrator@vsphere.local",
        root_help="holds the ds1 datastore directory",
        make_server=lambda port, root, user, password: SimServer(
            port, Inventory(root, user), user, password
        ),
        argv=argv,
    )


if __name__ == "__main__":
    main()
