-- The compute_tiers transformation as one DuckDB query, for bench/transform.py (a fair yardstick:
-- the same work as include/tier_sync/clv.py + master_csv.py, docs/tier-rulemd to the cent).
-- Set before running: VARIABLE sales_files / customers_files (lists of the manifest's Parquet
-- segments), as_of (TIMESTAMPTZ), window_start (as_of - window_days), out (the CSV path).
-- As-of view: among versions created before as_of (or with no created_at), the newest with
-- updated_at < as_of, else the oldest one (every version written later).
COPY (
    WITH
    cust_versions AS (
        SELECT *, (updated_at IS NULL OR updated_at < getvariable('as_of')) AS cur
        FROM read_parquet(getvariable('customers_files'))
        WHERE created_at IS NULL OR created_at < getvariable('as_of')
    ),
    customers AS (
        SELECT * EXCLUDE (cur) FROM cust_versions
        QUALIFY row_number() OVER (
            PARTITION BY id ORDER BY cur DESC, CASE WHEN cur THEN -version ELSE version END
        ) = 1
    ),
    live AS (
        SELECT * FROM customers
        WHERE deleted_at IS NULL OR deleted_at >= getvariable('as_of')
    ),
    sale_versions AS (
        SELECT id, customer_id, status, state, sale_date, deleted_at, amount_cents, version,
               (updated_at IS NULL OR updated_at < getvariable('as_of')) AS cur
        FROM read_parquet(getvariable('sales_files'))
        WHERE created_at IS NULL OR created_at < getvariable('as_of')
    ),
    sales AS (
        SELECT customer_id, status, state, sale_date, deleted_at, amount_cents AS amount_cents
        FROM sale_versions
        QUALIFY row_number() OVER (
            PARTITION BY id ORDER BY cur DESC, CASE WHEN cur THEN -version ELSE version END
        ) = 1
    ),
    qualifying AS (
        SELECT customer_id, amount_cents, sale_date FROM sales
        WHERE (deleted_at IS NULL OR deleted_at >= getvariable('as_of'))
          AND sale_date < getvariable('as_of')
          AND customer_id IS NOT NULL
          AND (status IN ('CLOSED', 'ONACCOUNT_CLOSED', 'LAYBY_CLOSED', 'DISPATCHED_CLOSED',
                            'PICKED_UP_CLOSED', 'SERVICE_CLOSED')
               OR (coalesce(status, '') = '' AND state = 'closed'))
    ),
    per_customer AS (
        SELECT customer_id,
               sum(amount_cents)::BIGINT AS ltv,
               count(*) FILTER (WHERE amount_cents > 0) AS orders,
               count(*) FILTER (WHERE amount_cents > 0 AND sale_date >= getvariable('window_start')) AS recent,
               min(sale_date) FILTER (WHERE amount_cents > 0) AS first_order,
               max(sale_date) FILTER (WHERE amount_cents > 0) AS last_order
        FROM qualifying GROUP BY customer_id
    ),
    metrics AS (
        SELECT l.id, l.customer_code, l.first_name, l.last_name, l.name, l.email, l.phone, l.mobile,
               l.enable_loyalty,
               coalesce(p.ltv, 0) AS ltv, coalesce(p.orders, 0) AS orders,
               coalesce(p.recent, 0) AS recent, p.first_order, p.last_order
        FROM live l LEFT JOIN per_customer p ON p.customer_id = l.id
    )
    SELECT
        id AS "Customer ID",
        customer_code AS "Customer Code",
        coalesce(nullif(trim(name), ''), trim(coalesce(first_name, '') || ' ' || coalesce(last_name, ''))) AS "Name",
        email AS "Email",
        coalesce(nullif(phone, ''), mobile) AS "Phone",
        printf('%s%d.%02d', CASE WHEN ltv < 0 THEN '-' ELSE '' END, abs(ltv) // 100, abs(ltv) % 100) AS "Lifetime Value",
        orders AS "Order Count",
        CASE WHEN orders > 0 THEN printf('%s%d.%02d',
            CASE WHEN ltv < 0 THEN '-' ELSE '' END,
            ((2 * abs(ltv) + orders) // (2 * orders)) // 100, ((2 * abs(ltv) + orders) // (2 * orders)) % 100)
        END AS "Avg Order Value",
        strftime(first_order AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ') AS "First Order",
        strftime(last_order AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%SZ') AS "Last Order",
        (epoch_us(getvariable('as_of')) - epoch_us(last_order)) // 86400000000 AS "Days Since Last Order",
        recent AS "Purchases Last 30 Days",
        CASE WHEN enable_loyalty THEN 'true' ELSE 'false' END AS "Loyalty Member",
        CASE
            WHEN orders < 1 THEN 'None'
            WHEN ltv >= 150000 THEN 'Evergreen'
            WHEN ltv >= 75000 THEN 'Bloom'
            WHEN ltv >= 25000 OR recent >= 3 THEN 'Sprout'
            WHEN enable_loyalty THEN 'Seed'
            ELSE 'First Time Buyer'
        END AS "Tier"
    FROM metrics
    ORDER BY id
) TO '__OUT__' (HEADER, DELIMITER ',');
