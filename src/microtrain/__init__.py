"""microtrain: on-device training of int8 networks under 256 KB of SRAM."""

__version__ = "0.1.0"
