"""`tasks.redis_url`: one Redis URL, Sentinel and TLS included, for every client and for Celery."""

from __future__ import annotations

import ssl

import pytest

from tasks.redis_url import SentinelTarget, broker_settings, parse_sentinel_url, redacted
from tasks.settings import QueueSettings

URL = "sentinel://:s3cret@10.0.0.1:26379,10.0.0.2:26380,sentinel-c/2?master_name=localq&sentinel_password=pw2"


def test_a_sentinel_url_names_the_master_and_every_sentinel():
    assert parse_sentinel_url(URL) == SentinelTarget(
        sentinels=(("10.0.0.1", 26379), ("10.0.0.2", 26380), ("sentinel-c", 26379)),
        master_name="localq", db=2, password="s3cret", sentinel_password="pw2")
    # kombu's own spelling is read too
    assert parse_sentinel_url("sentinel://a:1;sentinel://b:2?master_name=m").sentinels == (("a", 1), ("b", 2))


@pytest.mark.parametrize(("url", "says"), [
    ("sentinel://a:1,b:2", "master"),
    ("sentinel://a:x?master_name=m", "port"),
    ("sentinel://:p@a:1,,b:2?master_name=m", "host"),
    ("sentinel://a:1/zero?master_name=m", "database"),
])
def test_a_bad_sentinel_url_is_refused_without_repeating_it(url, says):
    with pytest.raises(ValueError, match=says) as caught:
        parse_sentinel_url(url)
    assert url not in str(caught.value)
    with pytest.raises(ValueError, match="LOCALQ_REDIS_URL"):
        QueueSettings.from_env({"LOCALQ_REDIS_URL": url})


def test_celery_gets_kombus_sentinel_spelling():
    broker, options, use_ssl = broker_settings(URL)
    assert broker == "sentinel://:s3cret@10.0.0.1:26379/2;sentinel://:s3cret@10.0.0.2:26380/2;sentinel://:s3cret@sentinel-c:26379/2"
    assert options == {"master_name": "localq", "sentinel_kwargs": {"password": "pw2"}} and use_ssl is None
    assert QueueSettings.from_env({"LOCALQ_REDIS_URL": URL}).redis_url == URL


def test_celery_checks_a_rediss_servers_certificate_unless_told_not_to():
    broker, options, use_ssl = broker_settings("rediss://:pw@h:6380/0?ssl_ca_certs=/etc/ca.pem")
    assert broker == "rediss://:pw@h:6380/0" and options == {}
    assert use_ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED, "ssl_ca_certs": "/etc/ca.pem"}
    assert broker_settings("rediss://h:6380/0?ssl_cert_reqs=none")[2] == {"ssl_cert_reqs": ssl.CERT_NONE}
    assert broker_settings("redis://h:6379/0") == ("redis://h:6379/0", {}, None)


def test_passwords_never_printed():
    shown = redacted(URL)
    assert "s3cret" not in shown and "pw2" not in shown and "10.0.0.2:26380" in shown
    assert redacted("redis://:pw@h:1/0") == "redis://:***@h:1/0"
    assert redacted("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"
    assert redacted("redis://h:1/0") == "redis://h:1/0"
    with pytest.raises(ValueError) as caught:
        QueueSettings.from_env({"LOCALQ_REDIS_URL": "http://:topsecret@h:1/0"})
    assert "topsecret" not in str(caught.value)
