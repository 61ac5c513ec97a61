"""Email edges: inbound SMTP/LMTP, queue, authentication."""
