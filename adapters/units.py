"""Engineering units as plant systems write them -> UN/CEFACT Rec. 20 codes (Sparkplug, UNS).

Only unambiguous spellings map; anything else is kept as ``engineering_unit`` text only.
"""

from __future__ import annotations

_UNITS: dict[str, str] = {
    # temperature, pressure
    "°c": "CEL", "degc": "CEL", "c": "CEL", "celsius": "CEL",
    "°f": "FAH", "degf": "FAH", "fahrenheit": "FAH",
    "k": "KEL", "kelvin": "KEL",
    "bar": "BAR", "mbar": "MBR", "pa": "PAL", "kpa": "KPA", "mpa": "MPA", "psi": "PS",
    # mass, length, volume
    "kg": "KGM", "g": "GRM", "mg": "MGM", "t": "TNE", "lb": "LBR",
    "mm": "MMT", "cm": "CMT", "m": "MTR", "km": "KMT", "in": "INH", "ft": "FOT",
    "l": "LTR", "ml": "MLT", "m3": "MTQ", "m³": "MTQ",
    # flow, speed
    "l/min": "L2", "m3/h": "MQH", "m³/h": "MQH", "rpm": "RPM", "1/min": "RPM", "m/s": "MTS",
    # time
    "s": "SEC", "sec": "SEC", "min": "MIN", "h": "HUR",
    # electrical, energy
    "v": "VLT", "a": "AMP", "ma": "4K", "w": "WTT", "kw": "KWT", "kwh": "KWH", "wh": "WHR",
    "hz": "HTZ",
    # ratio, count
    "%": "P1", "percent": "P1", "ea": "EA", "pcs": "H87",
}  # fmt: skip


def uom_code(unit: str) -> str | None:
    return _UNITS.get(unit.strip().lower())
