"""gRPC over HTTP/2, as containerkit speaks it on its unix socket: HTTP/2 framing (:mod:`.http2`), HPACK
(:mod:`.hpack`) and gRPC's status, timeout and message conventions (:mod:`.status`), shared by ckctl's client
(:mod:`core.cli.rpc`) and the daemon's server (:mod:`.server`). Importing the package or the three shared
modules loads nothing beyond the standard library; only :mod:`.server` imports grpcio (for
:class:`grpc.ServicerContext`)."""
