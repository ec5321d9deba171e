"""Target lists and the service config that gives round_robin, health checks and retries."""

from __future__ import annotations

import json

import pytest

from effllm.client.channel import (
    ClientSecurity,
    balanced_target,
    channel_options,
    make_channel,
    service_config,
    split_targets,
)


def test_split_and_balance() -> None:
    assert split_targets("a:1, b:2,") == ["a:1", "b:2"]
    assert split_targets(["a:1,b:2", "c:3"]) == ["a:1", "b:2", "c:3"]
    assert balanced_target(["dns:///x:1"]) == "dns:///x:1"  # one target: any gRPC URI, untouched
    assert balanced_target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert balanced_target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError):
        balanced_target(["127.0.0.1:1", "[::1]:2"])
    with pytest.raises(ValueError):
        balanced_target(["127.0.0.1", "127.0.0.1:2"])
    with pytest.raises(ValueError):
        split_targets(" , ")


def test_service_config_only_for_replicas() -> None:
    assert service_config(1) is None
    assert not any(k == "grpc.service_config" for k, _ in channel_options(1, None))
    config = json.loads(service_config(3) or "")
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": ""}
    policy = config["methodConfig"][0]["retryPolicy"]
    assert policy["retryableStatusCodes"] == ["UNAVAILABLE"] and 2 <= policy["maxAttempts"] <= 5
    assert config["methodConfig"][0]["name"] == [{"service": "effllm.v1.GenerationService"}]
    make_channel(["127.0.0.1:1", "127.0.0.1:2"])[0].close()  # gRPC accepts the config


def test_security_validation() -> None:
    with pytest.raises(ValueError):
        ClientSecurity(client_cert=b"x")
    assert ClientSecurity(root_cert=b"x").tls
    assert ClientSecurity(token="abc").metadata == (("authorization", "Bearer abc"),)
    with pytest.raises(ValueError):
        ClientSecurity(token="a b")
