DROP TABLE order_events;
ALTER TABLE customers DROP COLUMN loyalty_points;
