"""ckctl events: events as they happen, one line each (``TIME NAMESPACE TOPIC EVENT-JSON``), as ``ctr events``.

Events of every namespace are shown unless a filter says otherwise (``namespace==default``,
``topic~="^/tasks/"``, ``event.id==c1``). Runs until interrupted or the daemon stops.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from core.cli import rpc
from core.cli.client import Client, CliError, describe_rpc_error
from core.cli.records import timestamp_text


def add_commands(commands: Any) -> None:
    parser = commands.add_parser("events", aliases=["event"], help="print events as they happen")
    parser.add_argument("filters", nargs="*", metavar="FILTER", help="containerd filters, e.g. topic~=/containers/")
    parser.set_defaults(handler=show_events)


def event_json(event: Any) -> str:
    """An event Any as compact JSON with proto field names (``{"type_url": ...}`` for an unknown type)."""
    from google.protobuf import json_format

    from core.event_messages import message_of

    try:
        value = json_format.MessageToDict(message_of(event), preserving_proto_field_name=True)
    except (TypeError, json_format.Error):  # an unknown type, here or in an Any within
        value = {"type_url": event.type_url}
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def show_events(client: Client, args: argparse.Namespace) -> int:
    from core.api.containerd.services.events.v1 import events_pb2

    stub = client.stub(events_pb2, "Events")
    stream = stub.Subscribe(events_pb2.SubscribeRequest(filters=args.filters))  # of every namespace: no metadata
    try:
        for envelope in stream:
            text = event_json(envelope.event) if envelope.HasField("event") else ""
            print(timestamp_text(envelope.timestamp), envelope.namespace, envelope.topic, text, flush=True)
    except rpc.RpcError as err:
        raise CliError(describe_rpc_error(err, client.address)) from None
    finally:
        stream.cancel()
    return 0
