-- Alerts, version 3: each sink's delivery loop looks up its own due rows.
CREATE INDEX alert_outbox_sink_due ON alert_outbox (sink, state, next_attempt_at);
