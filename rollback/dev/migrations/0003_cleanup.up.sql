-- Destructive, and wrong: drops customers' e-mail addresses and order notes, and rounds
-- every amount. The data is gone from the live database after this.
ALTER TABLE customers DROP COLUMN email;
ALTER TABLE orders DROP COLUMN note;
UPDATE orders SET amount = round(amount);
