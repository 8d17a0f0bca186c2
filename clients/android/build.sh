#!/usr/bin/env bash
# Builds the library (build/courier-client.jar) and the test driver (build/test-classes)
# with plain javac against Debian's jars (libokhttp-java, libokio-java,
# libandroid-json-org-java). An Android app gets OkHttp from Gradle and org.json from
# the platform instead.
set -euo pipefail
cd "$(dirname "$0")"
JARS=${COURIER_JAVA_LIBS:-/usr/share/java}
CP="$JARS/okhttp.jar:$JARS/okio.jar:$JARS/json-android.jar"
rm -rf build && mkdir -p build/classes build/test-classes
javac -Xlint:all -Werror --release 11 -d build/classes -cp "$CP" \
  $(find src/main/java -name '*.java')
jar --create --file build/courier-client.jar -C build/classes .
javac --release 11 -d build/test-classes -cp "$CP:build/courier-client.jar" \
  $(find src/test/java -name '*.java')
echo "$CP:build/courier-client.jar:build/test-classes"
