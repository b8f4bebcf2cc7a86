-- Snowflake reads the bucket through an IAM role it assumes (deploy/aws/snowflake-*.json):
-- no AWS keys are stored in Snowflake. After the first apply, DESC INTEGRATION gives the
-- STORAGE_AWS_IAM_USER_ARN and STORAGE_AWS_EXTERNAL_ID to put in the role's trust policy.
{% if integration %}
CREATE STORAGE INTEGRATION IF NOT EXISTS {{ integration }}
  TYPE = EXTERNAL_STAGE
  STORAGE_PROVIDER = 'S3'
  ENABLED = TRUE
  STORAGE_AWS_ROLE_ARN = '{{ aws_role_arn }}'
  STORAGE_ALLOWED_LOCATIONS = ('{{ stage_url }}');
{% endif %}
