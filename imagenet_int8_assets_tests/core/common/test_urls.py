"""Credentials inside URLs are never shown: core.common.urls."""

import pytest

from imagenet_int8_assets.core.common.urls import has_credentials, redact_url, redact_urls


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://user:pw@127.0.0.1:8080/api", "http://***@127.0.0.1:8080/api"),
        ("https://token@hub.example/api/repos", "https://***@hub.example/api/repos"),
        # AWS secret keys hold "/" and "+" unescaped
        ("s3://AKIA123:se/cr+et@bucket/prefix", "s3://***@bucket/prefix"),
        ("http://a:b@host/path@x", "http://***@host/path@x"),
    ],
)
def test_credentials_are_masked(url, shown):
    assert has_credentials(url)
    assert redact_url(url) == shown


@pytest.mark.parametrize("url", ["https://huggingface.co/datasets/x", "s3://bucket/pre@fix", "http://host/x@y", ""])
def test_urls_without_credentials_are_unchanged(url):
    assert not has_credentials(url)
    assert redact_url(url) == url


def test_every_url_in_a_message_is_masked():
    message = "404 Client Error for url: http://u:secret1@127.0.0.1:5/api/x?y=1 (mirror s3://k:secret2@b/p)"
    shown = redact_urls(message)
    assert "secret1" not in shown and "secret2" not in shown
    assert shown == "404 Client Error for url: http://***@127.0.0.1:5/api/x?y=1 (mirror s3://***@b/p)"
