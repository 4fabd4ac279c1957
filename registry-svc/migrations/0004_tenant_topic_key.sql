-- Kafka refuses to create a topic whose name differs from an existing one's only in `.`
-- versus `_`, so tenants `a.b` and `a_b` cannot both have topics. Tenant ids are kept unique
-- with the two characters treated alike; the index expression is what
-- `ferrule_schemas::topic::tenant_collision_key` computes.
--
-- A database may already hold such groups (created before this rule). The migration must not
-- fail the start-up over them, and choosing which tenant to rename or delete is the
-- operator's call: those rows are left out of the index (they work as before, with one set of
-- topics between them in Kafka) and are named in Ferrule's log at every start-up (db.rs).
-- Every other tenant, and every new one, is held to the rule by the index; a new id that
-- clashes with a left-out row is still refused by the check the registry makes before its
-- insert (that one case is not race-free).
DO $$
DECLARE
    clashing text[];
BEGIN
    SELECT array_agg(tenant_id ORDER BY tenant_id) INTO clashing
      FROM tenants
     WHERE replace(tenant_id, '.', '_') IN (
           SELECT replace(tenant_id, '.', '_') FROM tenants
            GROUP BY 1 HAVING count(*) > 1);
    IF clashing IS NULL THEN
        CREATE UNIQUE INDEX tenants_topic_key_idx ON tenants ((replace(tenant_id, '.', '_')));
    ELSE
        RAISE WARNING 'tenants whose Kafka topics clash (ids equal once . and _ are treated alike), left out of tenants_topic_key_idx: %', clashing;
        EXECUTE format(
            'CREATE UNIQUE INDEX tenants_topic_key_idx ON tenants ((replace(tenant_id, ''.'', ''_''))) WHERE tenant_id <> ALL (%L::text[])',
            clashing);
    END IF;
END
$$;
