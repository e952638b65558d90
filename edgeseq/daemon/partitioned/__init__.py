"""Streams partitioned across daemons on NATS JetStream (docs/cluster.md): where samples,
leases and checkpoints live (layout), who owns which partition (leases), and each partition's
states in a key-value bucket (checkpoints). transports/nats.py puts them to work."""
