// Command kube-apiserver is the upstream kube-apiserver entry point with two
// defaults that make it start on a machine without a default route.
package main

import (
	"os"
	"strings"

	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"
	_ "k8s.io/component-base/metrics/prometheus/clientgo"
	_ "k8s.io/component-base/metrics/prometheus/version"
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	addDefault := func(flag, val string) {
		for _, a := range os.Args[1:] {
			if strings.HasPrefix(a, flag) {
				return
			}
		}
		os.Args = append(os.Args, flag+"="+val)
	}
	addDefault("--advertise-address", "127.0.0.1")
	addDefault("--endpoint-reconciler-type", "none")
	os.Exit(cli.Run(app.NewAPIServerCommand()))
}
