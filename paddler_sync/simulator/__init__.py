"""A llama.cpp server double: same API and wire format, slots that really queue, tunable speed."""
