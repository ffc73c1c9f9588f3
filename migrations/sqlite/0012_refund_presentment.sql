-- The transfer's own (presentment) amount beside its refund, when the money
-- that comes back is counted otherwise: a Stripe outbound transfer refunds
-- `from.debited`, what left the financial account, which may differ in
-- amount and currency from the `amount` it was presented in.
ALTER TABLE refunds ADD COLUMN presentment_amount INTEGER;
ALTER TABLE refunds ADD COLUMN presentment_currency TEXT;
