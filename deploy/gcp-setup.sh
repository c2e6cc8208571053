#!/usr/bin/env bash
# The Google Cloud side of a gmail-sync deployment, with gcloud (README.md "Deploying"):
#   1. the APIs: Pub/Sub, Gmail, IAM Credentials (keyless delegation signs through it);
#   2. the topic Gmail publishes to, and roles/pubsub.publisher on it for Gmail's push service
#      account and nobody else (whoever can publish there can inject notifications);
#   3. the dead-letter topic (with a subscription that keeps what lands there) and the pull
#      subscription of the workers: ack deadline, retention, retry backoff, dead-lettering after
#      MAX_DELIVERY_ATTEMPTS, never expiring; the grants Pub/Sub's service agent needs to
#      dead-letter;
#   4. the workload's Google service account: roles/pubsub.subscriber and roles/pubsub.viewer
#      on the subscription, and the Workload Identity binding to the Kubernetes service account;
#   5. Gmail credentials: with DELEGATION=keyless (the default) the delegating service account
#      and roles/iam.serviceAccountTokenCreator on it for the workload's; it prints the client id
#      to authorize in the Workspace Admin console (that step, and the OAuth client of per-user
#      refresh tokens, are manual: see the end of the output);
#   6. with CREATE_REDIS=1, a Memorystore for Redis instance (TLS, AUTH, noeviction, RDB).
# Every step is idempotent: what exists is kept (the subscription's settings are updated to
# the values below), IAM bindings are added once.
#
# Usage:  PROJECT_ID=acme-mail bash deploy/gcp-setup.sh --dry-run   # print the commands only
#         PROJECT_ID=acme-mail bash deploy/gcp-setup.sh             # run them
# Any variable below can be set in the environment. Needs gcloud, logged in as someone who may
# create topics, subscriptions and service accounts and set IAM policies in the project.
set -euo pipefail

# --- settings ------------------------------------------------------------------------------
PROJECT_ID=${PROJECT_ID:-}
REGION=${REGION:-europe-west1}                        # Memorystore region (CREATE_REDIS=1)
TOPIC=${TOPIC:-gmail-push}                            # GMAIL_SYNC_TOPIC
SUBSCRIPTION=${SUBSCRIPTION:-gmail-sync}              # GMAIL_SYNC_SUBSCRIPTION
DEAD_LETTER_TOPIC=${DEAD_LETTER_TOPIC:-gmail-sync-dead-letter}
DEAD_LETTER_SUBSCRIPTION=${DEAD_LETTER_SUBSCRIPTION:-gmail-sync-dead-letter}
# The worker asks for 60 s on its stream (GMAIL_SYNC_ACK_EXTENSION_SECS) and extends leases
# itself; this is the subscription's default for everything else.
ACK_DEADLINE_SECS=${ACK_DEADLINE_SECS:-60}
# Unacked notifications are kept this long (Gmail's history reaches back about a week anyway;
# a notification is a hint, the stored cursor is the truth).
MESSAGE_RETENTION=${MESSAGE_RETENTION:-7d}
# A nacked notification comes back after an exponential backoff between these two.
MIN_RETRY_DELAY=${MIN_RETRY_DELAY:-10s}
MAX_RETRY_DELAY=${MAX_RETRY_DELAY:-600s}
# Deliveries before a notification goes to the dead-letter topic (5-100). With the backoff
# above, 20 attempts span more than two hours of failures. Dropping one is safe: the fallback sync
# (GMAIL_SYNC_FALLBACK_SILENCE_SECS) reads every change after the cursor anyway.
MAX_DELIVERY_ATTEMPTS=${MAX_DELIVERY_ATTEMPTS:-20}
WORKLOAD_SA_NAME=${WORKLOAD_SA_NAME:-gmail-sync}       # iam.gke.io/gcp-service-account
K8S_NAMESPACE=${K8S_NAMESPACE:-gmail-sync}            # the overlay's namespace
K8S_SERVICE_ACCOUNT=${K8S_SERVICE_ACCOUNT:-gmail-sync}
# Gmail credentials: keyless (domain-wide delegation through IAM signJwt, recommended on GKE),
# key-file (delegation with a JSON key; the key itself is made by hand, see the output), or
# none (per-user refresh tokens only).
DELEGATION=${DELEGATION:-keyless}
DELEGATE_SA_NAME=${DELEGATE_SA_NAME:-gmail-sync-delegate}  # GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT
GMAIL_SCOPES=${GMAIL_SCOPES:-https://www.googleapis.com/auth/gmail.metadata}  # GMAIL_SYNC_GMAIL_SCOPES
# Memorystore for Redis (only with CREATE_REDIS=1; else bring your own, README "Deploying").
CREATE_REDIS=${CREATE_REDIS:-0}
REDIS_INSTANCE=${REDIS_INSTANCE:-gmail-sync}
REDIS_SIZE_GB=${REDIS_SIZE_GB:-2}
REDIS_TIER=${REDIS_TIER:-standard}                    # standard = a replica with failover
REDIS_VERSION=${REDIS_VERSION:-redis_7_2}
REDIS_NETWORK=${REDIS_NETWORK:-default}               # the GKE cluster's VPC network

# The only principal that may publish to TOPIC.
GMAIL_PUSH_SA=gmail-api-push@system.gserviceaccount.com

# --- plumbing ------------------------------------------------------------------------------
DRY_RUN=0
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }
for arg in "$@"; do
  case $arg in
    --dry-run | -n) DRY_RUN=1 ;;
    --help | -h) usage; exit 0 ;;
    *) printf 'gcp-setup: unknown argument %s (see --help)\n' "$arg" >&2; exit 2 ;;
  esac
done
die() { printf 'gcp-setup: ERROR: %s\n' "$*" >&2; exit 1; }
say() { printf '\n# %s\n' "$*"; }
[[ -n $PROJECT_ID ]] || die "set PROJECT_ID (e.g. PROJECT_ID=acme-mail bash deploy/gcp-setup.sh --dry-run)"
case $DELEGATION in keyless | key-file | none) ;; *) die "DELEGATION must be keyless, key-file or none" ;; esac
if [[ $DRY_RUN -eq 0 ]]; then
  command -v gcloud >/dev/null 2>&1 || die "gcloud not found: install the Google Cloud CLI"
fi

# show CMD...: the command as shell input (in a dry run, $PROJECT_NUMBER stays a variable, so
# the output can be run as a script).
show() { printf '%q ' "$@" | sed 's/ $//; s/\\\$PROJECT_NUMBER/${PROJECT_NUMBER}/g'; }
# run CMD...: prints the command, then runs it (not with --dry-run).
run() {
  printf '%s\n' "$(show "$@")"
  [[ $DRY_RUN -eq 1 ]] || "$@"
}
# ensure "DESCRIBE..." -- CREATE...: runs CREATE unless DESCRIBE succeeds (the thing exists).
ensure() {
  local describe=() create=()
  while [[ $1 != -- ]]; do describe+=("$1"); shift; done
  shift
  create=("$@")
  if [[ $DRY_RUN -eq 1 ]]; then
    printf '%s >/dev/null 2>&1 ||\n  %s\n' "$(show "${describe[@]}")" "$(show "${create[@]}")"
  elif "${describe[@]}" >/dev/null 2>&1; then
    printf '# exists: %s\n' "$(show "${describe[@]}")"
  else
    run "${create[@]}"
  fi
}

P=(--project "$PROJECT_ID")
WORKLOAD_SA=$WORKLOAD_SA_NAME@$PROJECT_ID.iam.gserviceaccount.com
DELEGATE_SA=$DELEGATE_SA_NAME@$PROJECT_ID.iam.gserviceaccount.com
WI_MEMBER="serviceAccount:$PROJECT_ID.svc.id.goog[$K8S_NAMESPACE/$K8S_SERVICE_ACCOUNT]"
if [[ $DRY_RUN -eq 1 ]]; then
  echo "# dry run: the commands for project $PROJECT_ID (nothing is called)"
  PROJECT_NUMBER=${PROJECT_NUMBER:-'$PROJECT_NUMBER'}
  echo "PROJECT_NUMBER=\$(gcloud projects describe $PROJECT_ID --format='value(projectNumber)')"
else
  PROJECT_NUMBER=$(gcloud projects describe "$PROJECT_ID" --format='value(projectNumber)') ||
    die "cannot read project $PROJECT_ID (gcloud auth login? the right project id?)"
fi
PUBSUB_AGENT=service-$PROJECT_NUMBER@gcp-sa-pubsub.iam.gserviceaccount.com

# --- 1. APIs -------------------------------------------------------------------------------
say "1. APIs"
apis=(pubsub.googleapis.com gmail.googleapis.com)
[[ $DELEGATION == keyless ]] && apis+=(iamcredentials.googleapis.com)
[[ $CREATE_REDIS == 1 ]] && apis+=(redis.googleapis.com)
run gcloud services enable "${apis[@]}" "${P[@]}"

# --- 2. topic and its single publisher -----------------------------------------------------
say "2. topic $TOPIC; only Gmail's push service account may publish (any publisher could inject notifications)"
ensure gcloud pubsub topics describe "$TOPIC" "${P[@]}" -- \
  gcloud pubsub topics create "$TOPIC" "${P[@]}"
run gcloud pubsub topics add-iam-policy-binding "$TOPIC" "${P[@]}" \
  --member "serviceAccount:$GMAIL_PUSH_SA" --role roles/pubsub.publisher
if [[ $DRY_RUN -eq 0 ]]; then
  others=$(gcloud pubsub topics get-iam-policy "$TOPIC" "${P[@]}" --flatten 'bindings[].members' \
    --filter 'bindings.role:(roles/pubsub.publisher roles/pubsub.editor roles/pubsub.admin)' \
    --format 'value(bindings.role,bindings.members)' | grep -v "serviceAccount:$GMAIL_PUSH_SA\$" || true)
  if [[ -n $others ]]; then
    printf '# WARNING: others may publish to %s; remove them unless you mean it:\n' "$TOPIC"
    while read -r role member; do
      printf '#   gcloud pubsub topics remove-iam-policy-binding %s --project %s --member %s --role %s\n' \
        "$TOPIC" "$PROJECT_ID" "$member" "$role"
    done <<<"$others"
  fi
  echo "# (project-wide roles/pubsub.publisher, roles/pubsub.editor, roles/editor and roles/owner publish to every topic too)"
fi

# --- 3. dead-letter topic and the subscription ---------------------------------------------
say "3. dead-letter topic $DEAD_LETTER_TOPIC (kept by subscription $DEAD_LETTER_SUBSCRIPTION) and subscription $SUBSCRIPTION"
ensure gcloud pubsub topics describe "$DEAD_LETTER_TOPIC" "${P[@]}" -- \
  gcloud pubsub topics create "$DEAD_LETTER_TOPIC" "${P[@]}"
# A topic without a subscription drops what it gets; this one keeps dead letters to look at.
ensure gcloud pubsub subscriptions describe "$DEAD_LETTER_SUBSCRIPTION" "${P[@]}" -- \
  gcloud pubsub subscriptions create "$DEAD_LETTER_SUBSCRIPTION" "${P[@]}" \
  --topic "$DEAD_LETTER_TOPIC" --message-retention-duration 7d --expiration-period never
sub_settings=(
  --ack-deadline "$ACK_DEADLINE_SECS"
  --message-retention-duration "$MESSAGE_RETENTION"
  --expiration-period never
  --min-retry-delay "$MIN_RETRY_DELAY" --max-retry-delay "$MAX_RETRY_DELAY"
  --dead-letter-topic "projects/$PROJECT_ID/topics/$DEAD_LETTER_TOPIC"
  --max-delivery-attempts "$MAX_DELIVERY_ATTEMPTS"
)
# Pull (no --push-endpoint): the workers connect out with StreamingPull.
if [[ $DRY_RUN -eq 0 ]] && gcloud pubsub subscriptions describe "$SUBSCRIPTION" "${P[@]}" >/dev/null 2>&1; then
  run gcloud pubsub subscriptions update "$SUBSCRIPTION" "${P[@]}" "${sub_settings[@]}"
else
  ensure gcloud pubsub subscriptions describe "$SUBSCRIPTION" "${P[@]}" -- \
    gcloud pubsub subscriptions create "$SUBSCRIPTION" "${P[@]}" --topic "$TOPIC" "${sub_settings[@]}"
fi
# Dead-lettering is done by Pub/Sub's service agent: it must publish to the dead-letter topic
# and acknowledge on the subscription it forwards from.
run gcloud pubsub topics add-iam-policy-binding "$DEAD_LETTER_TOPIC" "${P[@]}" \
  --member "serviceAccount:$PUBSUB_AGENT" --role roles/pubsub.publisher
run gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" "${P[@]}" \
  --member "serviceAccount:$PUBSUB_AGENT" --role roles/pubsub.subscriber

# --- 4. the workload's service account -----------------------------------------------------
say "4. service account $WORKLOAD_SA: pulls from $SUBSCRIPTION; Workload Identity for $K8S_NAMESPACE/$K8S_SERVICE_ACCOUNT"
ensure gcloud iam service-accounts describe "$WORKLOAD_SA" "${P[@]}" -- \
  gcloud iam service-accounts create "$WORKLOAD_SA_NAME" "${P[@]}" --display-name "gmail-sync worker"
# subscriber: pull and ack; viewer: the startup check reads the subscription (GetSubscription).
for role in roles/pubsub.subscriber roles/pubsub.viewer; do
  run gcloud pubsub subscriptions add-iam-policy-binding "$SUBSCRIPTION" "${P[@]}" \
    --member "serviceAccount:$WORKLOAD_SA" --role "$role"
done
run gcloud iam service-accounts add-iam-policy-binding "$WORKLOAD_SA" "${P[@]}" \
  --member "$WI_MEMBER" --role roles/iam.workloadIdentityUser --condition None --quiet

# --- 5. Gmail credentials ------------------------------------------------------------------
if [[ $DELEGATION != none ]]; then
  say "5. delegating service account $DELEGATE_SA (domain-wide delegation, $DELEGATION; it needs no IAM roles)"
  ensure gcloud iam service-accounts describe "$DELEGATE_SA" "${P[@]}" -- \
    gcloud iam service-accounts create "$DELEGATE_SA_NAME" "${P[@]}" --display-name "gmail-sync domain-wide delegation"
  if [[ $DELEGATION == keyless ]]; then
    # The workload signs delegation JWTs as the delegating account (IAM signJwt): no key exists.
    run gcloud iam service-accounts add-iam-policy-binding "$DELEGATE_SA" "${P[@]}" \
      --member "serviceAccount:$WORKLOAD_SA" --role roles/iam.serviceAccountTokenCreator --condition None --quiet
  fi
  if [[ $DRY_RUN -eq 0 ]]; then
    client_id=$(gcloud iam service-accounts describe "$DELEGATE_SA" "${P[@]}" --format 'value(oauth2ClientId)')
  else
    client_id='$(gcloud iam service-accounts describe '"$DELEGATE_SA"' --project '"$PROJECT_ID"" --format 'value(oauth2ClientId)')"
  fi
else
  say "5. no delegation (DELEGATION=none): per-user refresh tokens only"
fi

# --- 6. Redis (optional) -------------------------------------------------------------------
if [[ $CREATE_REDIS == 1 ]]; then
  say "6. Memorystore for Redis $REDIS_INSTANCE: TLS, AUTH, maxmemory-policy noeviction, RDB snapshots"
  ensure gcloud redis instances describe "$REDIS_INSTANCE" --region "$REGION" "${P[@]}" -- \
    gcloud redis instances create "$REDIS_INSTANCE" --region "$REGION" "${P[@]}" \
    --tier "$REDIS_TIER" --size "$REDIS_SIZE_GB" --redis-version "$REDIS_VERSION" \
    --network "projects/$PROJECT_ID/global/networks/$REDIS_NETWORK" \
    --transit-encryption-mode server-authentication --enable-auth \
    --redis-config maxmemory-policy=noeviction \
    --persistence-mode rdb --rdb-snapshot-period 1h
  # An instance that existed already: make sure it never evicts the worker's keys.
  run gcloud redis instances update "$REDIS_INSTANCE" --region "$REGION" "${P[@]}" \
    --update-redis-config maxmemory-policy=noeviction
fi

# --- what is left to do by hand ------------------------------------------------------------
cat <<EOF

# ---------------------------------------------------------------------------------------------
# Done$([[ $DRY_RUN -eq 1 ]] && echo " (dry run: nothing was changed)"). For the overlay (deploy/overlays/example):
#   GMAIL_SYNC_TOPIC=projects/$PROJECT_ID/topics/$TOPIC
#   GMAIL_SYNC_SUBSCRIPTION=projects/$PROJECT_ID/subscriptions/$SUBSCRIPTION
#   ServiceAccount annotation iam.gke.io/gcp-service-account: $WORKLOAD_SA
#   namespace: $K8S_NAMESPACE   (the Workload Identity binding names it)
EOF
if [[ $DELEGATION == keyless ]]; then
  cat <<EOF
#   GMAIL_SYNC_DELEGATION_SERVICE_ACCOUNT=$DELEGATE_SA
EOF
fi
if [[ $DELEGATION != none ]]; then
  cat <<EOF
#
# By hand, a Workspace super admin: admin.google.com > Security > Access and data control >
# API controls > Domain-wide delegation > Add new:
#   Client ID:    $client_id
#   OAuth scopes: $GMAIL_SCOPES
# (exactly GMAIL_SYNC_GMAIL_SCOPES; it can take minutes to apply). Set GMAIL_SYNC_PROBE_MAILBOX
# to a real mailbox of the domain so startup proves the grant works.
EOF
fi
if [[ $DELEGATION == key-file ]]; then
  cat <<EOF
#
# Key file (components/delegation-key-file): make the key and store it as a Secret, never in
# the repository, then delete the local copy:
#   gcloud iam service-accounts keys create key.json --iam-account $DELEGATE_SA --project $PROJECT_ID
#   kubectl -n $K8S_NAMESPACE create secret generic gmail-sync-delegation-key --from-file=key.json=key.json
EOF
fi
cat <<EOF
#
# Per-user refresh tokens (consumer Gmail; components/refresh-tokens), in the Cloud console of
# $PROJECT_ID: APIs & Services > OAuth consent screen (scope $GMAIL_SCOPES; publish the
# app: tokens of an app in "Testing" expire after 7 days), then Credentials > Create OAuth
# client ID. README "Gmail credentials" has the rest.
EOF
if [[ $CREATE_REDIS == 1 ]]; then
  cat <<EOF
#
# Redis: host and port for GMAIL_SYNC_REDIS_URL=rediss://HOST:PORT/, the AUTH string and the
# server CA for the Secret gmail-sync-redis:
#   gcloud redis instances describe $REDIS_INSTANCE --region $REGION --project $PROJECT_ID --format 'value(host,port)'
#   gcloud redis instances get-auth-string $REDIS_INSTANCE --region $REGION --project $PROJECT_ID
#   gcloud redis instances describe $REDIS_INSTANCE --region $REGION --project $PROJECT_ID --format 'value(serverCaCerts[0].cert)'
EOF
fi
