"""People-facing clients: the terminal chat, the web UI, and the OpenAI-server
client they both use."""
