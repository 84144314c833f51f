-- Rate limits of a project (all its API keys together) and of one API key, in requests per
-- minute; NULL: the deployment's default (rate_limit.per_project, rate_limit.per_api_key).
ALTER TABLE projects ADD COLUMN requests_per_minute INTEGER CHECK (requests_per_minute BETWEEN 1 AND 1000000);
ALTER TABLE api_keys ADD COLUMN requests_per_minute INTEGER CHECK (requests_per_minute BETWEEN 1 AND 1000000);
