"""MES HTTP push source: ``POST /v1/events`` (see README.md)."""

from adapters.sources.mes_http.config import Config
from adapters.sources.mes_http.source import MesHttpSource, build

__all__ = ["Config", "MesHttpSource", "build"]
