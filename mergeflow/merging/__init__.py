"""Pure streaming fold engine: torch functions, state in, state out. No IO services here."""
