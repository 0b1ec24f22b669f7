"""Pre-training paradigms: what differs between a CLIP family and another kind of family."""
