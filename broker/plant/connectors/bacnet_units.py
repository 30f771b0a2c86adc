"""BACnet engineering units (clause 21, `BACnetEngineeringUnits`) in the policy's unit spelling.

The BACnet connector reads an analog object's `units` once per session and compares them
with the signal's `unit` (docs/bacnet.md, "Units"): a device configured in °F while the
policy says degC is a wrong reading, not a slightly different one. This module only names
units; it never converts a value from one unit to another (the policy's owners decide the
unit, and a silent conversion would hide a misconfigured device).
"""

from __future__ import annotations

from typing import Final

# BACnet unit (bacpypes3's name) → the policy's spelling first (policies/refrigeration.yaml,
# docs/model.md), then other spellings a policy may use for the same unit.
UNITS: Final[dict[str, tuple[str, ...]]] = {
    "noUnits": ("",),
    "degreesCelsius": ("degC", "°C"),
    "degreesFahrenheit": ("degF", "°F"),
    "degreesKelvin": ("K",),
    "deltaDegreesKelvin": ("K",),  # a temperature difference, e.g. superheat
    "percent": ("%",),
    "percentRelativeHumidity": ("%RH", "%"),
    "partsPerMillion": ("ppm",),
    "watts": ("W",),
    "kilowatts": ("kW",),
    "megawatts": ("MW",),
    "wattHours": ("Wh",),
    "kilowattHours": ("kWh",),
    "megawattHours": ("MWh",),
    "kilovoltAmperes": ("kVA",),
    "kilovoltAmperesReactive": ("kvar",),
    "powerFactor": ("",),
    "volts": ("V",),
    "amperes": ("A",),
    "milliamperes": ("mA",),
    "hertz": ("Hz",),
    "bars": ("bar",),
    "millibars": ("mbar",),
    "pascals": ("Pa",),
    "kilopascals": ("kPa",),
    "poundsForcePerSquareInch": ("psi",),
    "seconds": ("s",),
    "minutes": ("min",),
    "hours": ("h",),
    "revolutionsPerMinute": ("rpm",),
    "metersPerSecond": ("m/s",),
    "litersPerSecond": ("L/s",),
    "litersPerMinute": ("L/min",),
    "cubicMetersPerSecond": ("m3/s",),
    "cubicMetersPerHour": ("m3/h",),
    "kilogramsPerHour": ("kg/h",),
}


def our_unit(bacnet: str, written: str | None = None) -> str:
    """The policy spelling of the BACnet unit `bacnet` (bacpypes3's name, `degreesCelsius`);
    an unmapped unit keeps its BACnet name as the standard writes it (`written`, e.g.
    `degrees-rankine`, else `bacnet`)."""
    spellings = UNITS.get(bacnet)
    return spellings[0] if spellings else (written or bacnet)


def same_unit(bacnet: str, policy_unit: str) -> bool:
    """Whether the device's unit is the policy's, in any spelling of it (an unmapped BACnet
    unit matches only its own name)."""
    return policy_unit.strip() in UNITS.get(bacnet, (bacnet,))
