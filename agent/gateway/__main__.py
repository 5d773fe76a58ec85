"""``python -m agent.gateway [options]``: the same as ``edge-agent gateway``."""

from agent.gateway.cli import gateway

if __name__ == "__main__":
    gateway(prog_name="python -m agent.gateway")
