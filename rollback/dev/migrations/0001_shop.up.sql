-- The demo shop: customers and their orders, with some history to protect.
CREATE TABLE customers (
    id     bigserial PRIMARY KEY,
    name   text NOT NULL,
    email  text
);
CREATE TABLE orders (
    id          bigserial PRIMARY KEY,
    customer_id bigint NOT NULL REFERENCES customers (id),
    amount      numeric(10, 2) NOT NULL,
    note        text,
    created_at  timestamptz NOT NULL DEFAULT now()
);
INSERT INTO customers (name, email)
SELECT 'customer ' || g, 'customer' || g || '@example.com' FROM generate_series(1, 1000) g;
INSERT INTO orders (customer_id, amount, note)
SELECT 1 + g % 1000, (g % 500) + 0.99, 'gift wrap ' || g FROM generate_series(1, 5000) g;
