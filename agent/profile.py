"""Profile: milliseconds per decoder layer at several token counts, measured on this device."""
