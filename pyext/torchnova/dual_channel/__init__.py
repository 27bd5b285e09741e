"""CogVideo dual-channel attention: visibility rule (masks), dense reference, ops."""
