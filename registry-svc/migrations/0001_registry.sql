-- Device registry: tenants, devices, credentials. Documents are kept as the JSON the
-- management API accepts (normalised), keys as columns so lookups and conflicts are indexed.

CREATE TABLE tenants (
    tenant_id   text PRIMARY KEY,
    version     text NOT NULL,
    data        jsonb NOT NULL,
    created     timestamptz NOT NULL DEFAULT now(),
    updated     timestamptz
);
CREATE UNIQUE INDEX tenants_alias_idx ON tenants ((data->>'alias')) WHERE data ? 'alias';

CREATE TABLE devices (
    tenant_id           text NOT NULL REFERENCES tenants (tenant_id) ON DELETE CASCADE,
    device_id           text NOT NULL,
    version             text NOT NULL,
    credentials_version text NOT NULL,
    data                jsonb NOT NULL,
    created             timestamptz NOT NULL DEFAULT now(),
    updated             timestamptz,
    PRIMARY KEY (tenant_id, device_id)
);
CREATE INDEX devices_via_idx ON devices USING gin ((data->'via'));

CREATE TABLE credentials (
    tenant_id   text NOT NULL,
    device_id   text NOT NULL,
    type        text NOT NULL,
    auth_id     text NOT NULL,
    data        jsonb NOT NULL,
    PRIMARY KEY (tenant_id, type, auth_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX credentials_device_idx ON credentials (tenant_id, device_id);

-- Every change is announced on one channel so that caches in gateways drop stale entries and
-- live connections of disabled or deleted devices are closed.
CREATE FUNCTION ferrule_registry_notify() RETURNS trigger AS $$
DECLARE
    r record;
    kind text := TG_ARGV[0];
BEGIN
    IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
    IF kind = 'tenant' THEN
        PERFORM pg_notify('ferrule_registry', json_build_object(
            'kind', kind, 'op', TG_OP, 'tenant', r.tenant_id,
            'enabled', CASE WHEN TG_OP = 'DELETE' THEN false
                            ELSE coalesce((r.data->>'enabled')::boolean, true) END)::text);
    ELSIF kind = 'device' THEN
        PERFORM pg_notify('ferrule_registry', json_build_object(
            'kind', kind, 'op', TG_OP, 'tenant', r.tenant_id, 'device', r.device_id,
            'enabled', CASE WHEN TG_OP = 'DELETE' THEN false
                            ELSE coalesce((r.data->>'enabled')::boolean, true) END)::text);
    ELSE
        PERFORM pg_notify('ferrule_registry', json_build_object(
            'kind', kind, 'op', TG_OP, 'tenant', r.tenant_id, 'device', r.device_id)::text);
    END IF;
    RETURN NULL;
END;
$$ LANGUAGE plpgsql;

CREATE TRIGGER tenants_notify AFTER INSERT OR UPDATE OR DELETE ON tenants
    FOR EACH ROW EXECUTE FUNCTION ferrule_registry_notify('tenant');
CREATE TRIGGER devices_notify AFTER INSERT OR UPDATE OR DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION ferrule_registry_notify('device');
CREATE TRIGGER credentials_notify AFTER INSERT OR UPDATE OR DELETE ON credentials
    FOR EACH ROW EXECUTE FUNCTION ferrule_registry_notify('credentials');
