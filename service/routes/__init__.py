"""The HTTP routes, one module per group of endpoints; each is thin: parse, call, answer."""
