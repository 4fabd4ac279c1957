-- Command routing state (written by gateways and the command router): which gateway instance
-- holds a device's command subscription, the gateway a device last used, and the liveness of
-- instances. Kept here so that a router restart loses nothing; rows go with their device.

CREATE TABLE adapter_instances (
    instance_id text PRIMARY KEY,
    last_seen   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE command_consumers (
    tenant_id   text NOT NULL,
    device_id   text NOT NULL,
    instance_id text NOT NULL,
    -- NULL: until unregistered.
    expires     timestamptz,
    registered  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
CREATE INDEX command_consumers_instance_idx ON command_consumers (instance_id);

CREATE TABLE last_known_gateways (
    tenant_id  text NOT NULL,
    device_id  text NOT NULL,
    gateway_id text NOT NULL,
    updated    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, device_id),
    FOREIGN KEY (tenant_id, device_id) REFERENCES devices (tenant_id, device_id) ON DELETE CASCADE
);
