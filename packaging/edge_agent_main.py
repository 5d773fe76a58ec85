"""Entry point of the single-file binary: the same ``main`` as the ``edge-agent`` script."""

from agent.cli import main

if __name__ == "__main__":
    main()
