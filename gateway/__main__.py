"""``python -m gateway [options]``: the same as ``edge-agent gateway``."""

from gateway.cli import gateway

if __name__ == "__main__":
    gateway(prog_name="python -m gateway")
