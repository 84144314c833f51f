-- The chat service's own database (being written).
SELECT 1;
