-- The example backend's tables (PROTOCOL.md 6.6), as its Prisma migrations create them.
-- Applied by bench/run.sh to a private database that it drops afterwards.

CREATE TABLE "Document" (
    "id" TEXT NOT NULL,
    "activeSnapshotId" TEXT,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    CONSTRAINT "Document_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "Snapshot" (
    "id" TEXT NOT NULL,
    "latestVersion" INTEGER NOT NULL,
    "data" TEXT NOT NULL,
    "ciphertextHash" TEXT NOT NULL,
    "documentId" TEXT NOT NULL,
    "createdAt" TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP,
    "clocks" JSONB NOT NULL,
    "parentSnapshotUpdateClocks" JSONB NOT NULL,
    "parentSnapshotProof" TEXT NOT NULL,
    CONSTRAINT "Snapshot_pkey" PRIMARY KEY ("id")
);

CREATE TABLE "Update" (
    "id" TEXT NOT NULL,
    "version" INTEGER NOT NULL,
    "data" TEXT NOT NULL,
    "snapshotId" TEXT NOT NULL,
    "clock" INTEGER NOT NULL,
    "pubKey" TEXT NOT NULL
);

CREATE UNIQUE INDEX "Document_activeSnapshotId_key" ON "Document"("activeSnapshotId");
CREATE UNIQUE INDEX "Update_id_key" ON "Update"("id");
CREATE INDEX "Update_id_version_idx" ON "Update"("id", "version");
CREATE UNIQUE INDEX "Update_snapshotId_version_key" ON "Update"("snapshotId", "version");
CREATE UNIQUE INDEX "Update_snapshotId_pubKey_clock_key" ON "Update"("snapshotId", "pubKey", "clock");

ALTER TABLE "Document" ADD CONSTRAINT "Document_activeSnapshotId_fkey"
    FOREIGN KEY ("activeSnapshotId") REFERENCES "Snapshot"("id") ON DELETE SET NULL ON UPDATE CASCADE;
ALTER TABLE "Snapshot" ADD CONSTRAINT "Snapshot_documentId_fkey"
    FOREIGN KEY ("documentId") REFERENCES "Document"("id") ON DELETE RESTRICT ON UPDATE CASCADE;
ALTER TABLE "Update" ADD CONSTRAINT "Update_snapshotId_fkey"
    FOREIGN KEY ("snapshotId") REFERENCES "Snapshot"("id") ON DELETE RESTRICT ON UPDATE CASCADE;
