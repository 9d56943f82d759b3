"""The access policy of the governance tests (tests/models/test_access.py, tests/git/test_read_policy.py): who is who, the
policy, values that must never show up in a message, and adding files and reading the audit log of a repo."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import git, save_tensors

ALICE, BOB = "alice@example.com", "bob@example.com"
SECRET_VALUE = 1234.5678  # a tensor value that must never show up in messages
SECRET_ROW = "carol@hidden.example"

POLICY = """\
version: 1
roles:
  ml-core: [alice@example.com]
  pii-readers: ["@ml-core"]
rules:
  - allow: [read]
    roles: [ml-core]
  - deny: [read]
    paths: ["secret/*"]
  - deny: [read]
    paths: ["public/*.safetensors"]
    tensors: ["lm_head.*"]
    placeholder: true
  - deny: [read]
    paths: ["data/*.jsonl"]
    columns: [email]
  - allow: [write]
    roles: [ml-core]
  - deny: [write]
    paths: ["secret/*"]
    tensors: ["lm_head.*"]
"""


def add_file(repo: Path, path: str, data: bytes | None = None, ts: dict | None = None) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    if ts is not None:
        save_tensors(repo / path, ts)
    else:
        (repo / path).write_bytes(data or b"")
    git(repo, "add", path)


def audit_entries(repo: Path) -> list[dict]:
    log = repo / ".git" / "fmhub" / "audit.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []

# row-level rules: rows of tickets/* whose tier is "restricted" are readable by pii-readers only
ROW_RULES = """\
  - allow: [read]
    roles: [pii-readers]
    rows: {column: tier, values: [restricted]}
  - deny: [read]
    paths: ["tickets/*"]
    rows: {column: tier, values: [restricted]}
"""
