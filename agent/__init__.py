"""edge-agent: plant-edge store-and-forward agent."""

__version__ = "0.1.0"
