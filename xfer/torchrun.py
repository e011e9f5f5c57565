"""torchrun for one machine whose rendezvous store listens on 127.0.0.1 only.

    python -m xfer.torchrun --nproc_per_node=2 --master-addr=127.0.0.1 --master-port=<port> -m xfer.finetune_job ...

torch's TCPStore server binds every interface (`::`) whatever host it is
given, so `torchrun --standalone` (and `--master-addr=127.0.0.1`) listened on
the machine's network too. Here the static rendezvous's store (torchrun's
default backend) is handed a socket already bound to 127.0.0.1 and listening;
everything else is `python -m torch.distributed.run`, arguments included.
"""

from __future__ import annotations

import socket
import sys


def loopback_store(original):
    """A TCPStore factory: a server store listens on a socket bound to 127.0.0.1."""

    def create(host_name, port, world_size=None, is_master=False, *args, **kwargs):
        if is_master and kwargs.get("master_listen_fd") is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", port))
            sock.listen(128)
            # The store owns the descriptor from here on.
            kwargs["master_listen_fd"] = sock.detach()
        return original(host_name, port, world_size, is_master, *args, **kwargs)

    return create


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.rendezvous import static_tcp_rendezvous
    from torch.distributed.run import main as torchrun

    static_tcp_rendezvous.TCPStore = loopback_store(static_tcp_rendezvous.TCPStore)
    torchrun(sys.argv[1:] if argv is None else argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
