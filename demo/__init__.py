"""The README's end-to-end demo: the whole fleet loop on one machine (``quantfleet demo``).

Not part of the device or the operator's service: it drives both, as an operator
and a fleet of devices would, and stops everything it started. It may import any
part of quantfleet; nothing imports it (the ``quantfleet`` command finds its
``demo`` command through the ``quantfleet.commands`` entry point).
"""
