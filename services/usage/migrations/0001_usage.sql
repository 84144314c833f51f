-- The usage service's own database. (Being written.)
SELECT 1;
