-- Business applications that consume a tenant's data through the AMQP bridge: each is scoped
-- to one tenant and authenticates with SASL PLAIN `<app-id>@<tenant>` and a password kept here
-- in hashed form (the same secret rules as device `hashed-password` credentials).

CREATE TABLE applications (
    tenant_id text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    app_id    text NOT NULL,
    version   text NOT NULL,
    -- {"enabled": bool, "secrets": [...]} with secrets as stored (never plain).
    data      jsonb NOT NULL,
    created   timestamptz NOT NULL DEFAULT now(),
    updated   timestamptz,
    PRIMARY KEY (tenant_id, app_id)
);
