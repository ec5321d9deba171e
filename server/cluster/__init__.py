"""effllm.server.cluster: `effllm serve --replicas N` — many server cores behind one address, on Ray Serve.

Where to look:
  placement.py  choose a replica per request: adapter held (or assigned), objective from live figures, load
                = the front's own in-flight count per replica (Dispatcher) (pure: no Ray, no clock, no I/O)
  replica.py    the Serve deployment: one whole server core (engines, variants, adapter registry, runner,
                telemetry) per replica; methods the front calls through deployment handles
  routing.py    the Ray Serve RequestRouter that passes the front's ranking to Serve, and the front's view
                of the replicas and their routing stats
  front.py      our own grpc.aio server in front (auth/TLS/roles, health, reflection, the status table):
                forwards to replicas, retries a request that produced nothing, broadcasts admin calls
  launch.py     start or join a Ray cluster, deploy, serve, drain and stop every Ray process on exit
Invariant: nothing here is imported unless `--replicas` is given (placement.py, which is pure, aside); only
this package imports ray.
"""
