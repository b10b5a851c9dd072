#!/bin/sh
# One-shot set-up of MinIO for hashlake (the minio-init service of compose.yaml); safe on every `up`.
#   1. the images and index buckets;
#   2. the read-only S3 user of query connections (reads both buckets, writes nothing);
#   3. the images bucket's object events → the intake's webhook (target HASHLAKE, configured with
#      its token and queue_dir by the minio service's environment).
# The mc image has a shell but no grep: tests use `case`.
set -eu
: "${HASHLAKE_IMAGES_BUCKET:?}" "${HASHLAKE_INDEX_BUCKET:?}" "${HASHLAKE_QUERY_S3_ACCESS_KEY:?}" "${HASHLAKE_QUERY_S3_SECRET_KEY:?}"

mc alias set local http://minio:9000 "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$HASHLAKE_IMAGES_BUCKET" "local/$HASHLAKE_INDEX_BUCKET"

policy=/tmp/hashlake-query-policy.json
cat >"$policy" <<JSON
{"Version": "2012-10-17",
 "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"],
                "Resource": ["arn:aws:s3:::$HASHLAKE_IMAGES_BUCKET", "arn:aws:s3:::$HASHLAKE_IMAGES_BUCKET/*",
                             "arn:aws:s3:::$HASHLAKE_INDEX_BUCKET", "arn:aws:s3:::$HASHLAKE_INDEX_BUCKET/*"]}]}
JSON
mc admin policy create local hashlake-query "$policy"
mc admin user add local "$HASHLAKE_QUERY_S3_ACCESS_KEY" "$HASHLAKE_QUERY_S3_SECRET_KEY"
case "$(mc admin user info local "$HASHLAKE_QUERY_S3_ACCESS_KEY")" in
  *hashlake-query*) ;;  # attached on an earlier run (attaching twice is an error)
  *) mc admin policy attach local hashlake-query --user "$HASHLAKE_QUERY_S3_ACCESS_KEY" ;;
esac

# put = every ObjectCreated (PUT, POST, COPY, multipart); delete = ObjectRemoved and delete markers
mc event add --ignore-existing --event put,delete "local/$HASHLAKE_IMAGES_BUCKET" arn:minio:sqs::HASHLAKE:webhook
echo "minio-init: buckets $HASHLAKE_IMAGES_BUCKET, $HASHLAKE_INDEX_BUCKET; query user; events → intake"
