"""ZeroMQ wire protocol, policy server, controller client and the ALOHA chunk executor."""
