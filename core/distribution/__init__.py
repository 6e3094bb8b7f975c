"""Image distribution: registry references, credentials, the OCI distribution client, pull, push, archives,
conversion and signatures. A library usable without the daemon; the transfer service builds on it."""
