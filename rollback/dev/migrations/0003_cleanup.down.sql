ALTER TABLE customers ADD COLUMN email text;
ALTER TABLE orders ADD COLUMN note text;
