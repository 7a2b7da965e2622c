"""peewee models over the tables of migrations.py (the migrations own the schema)."""

from __future__ import annotations

import peewee as pw

from .db import database


class BaseModel(pw.Model):
    class Meta:
        database = database


class Rule(BaseModel):
    id = pw.AutoField()
    container_pattern = pw.TextField()
    destination_pattern = pw.TextField()
    port_pattern = pw.TextField(default="*")
    rule_type = pw.TextField(default="glob")
    action = pw.TextField()
    created_at = pw.FloatField()
    expires_at = pw.FloatField(null=True)
    last_used_at = pw.FloatField(null=True)
    created_by = pw.TextField(default="api")
    notes = pw.TextField(null=True)
    source = pw.TextField(default="global")
    session_id = pw.TextField(null=True)
    hit_count = pw.IntegerField(default=0)

    class Meta:
        table_name = "rules"


class Pending(BaseModel):
    id = pw.AutoField()
    container_name = pw.TextField()
    container_id = pw.TextField(default="")
    destination_host = pw.TextField()
    destination_port = pw.IntegerField()
    resolved_hostname = pw.TextField(null=True)
    first_seen = pw.FloatField()
    last_seen = pw.FloatField()
    attempt_count = pw.IntegerField(default=1)

    class Meta:
        table_name = "pending"


class Log(BaseModel):
    timestamp = pw.FloatField()
    container_name = pw.TextField()
    container_id = pw.TextField(default="")
    destination_host = pw.TextField()
    destination_port = pw.IntegerField()
    resolved_hostname = pw.TextField(null=True)
    method = pw.TextField()
    result = pw.TextField()
    rule_id = pw.IntegerField(null=True)
    response_time_ms = pw.FloatField(null=True)
    reason = pw.TextField(null=True)
    mitm_skip_reason = pw.TextField(null=True)

    class Meta:
        table_name = "logs"


class Setting(BaseModel):
    key = pw.TextField(primary_key=True)
    value = pw.TextField()
    updated_at = pw.FloatField()

    class Meta:
        table_name = "settings"


class DnsCache(BaseModel):
    ip = pw.TextField(primary_key=True)
    hostname = pw.TextField()
    updated_at = pw.FloatField()

    class Meta:
        table_name = "dns_cache"


class Counter(BaseModel):
    key = pw.TextField(primary_key=True)
    value = pw.IntegerField()

    class Meta:
        table_name = "meta"


def meta_value(key: str) -> int:
    row = Counter.get_or_none(Counter.key == key)
    return row.value if row else 0
