-- Additive: a loyalty balance per customer and an event log per order.
ALTER TABLE customers ADD COLUMN loyalty_points integer NOT NULL DEFAULT 0;
CREATE TABLE order_events (
    id       bigserial PRIMARY KEY,
    order_id bigint NOT NULL,
    event    text NOT NULL
);
